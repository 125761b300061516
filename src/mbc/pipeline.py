"""The main job: train (or reuse) MBC and MAC on generated documents, then run the online evaluation.

Everything it needs ships with the package: the bundled SmolLM2 and MiniLM, and fictional
documents generated on the spot. Trained adapters are cached under ``$MBC_CACHE/trained/`` (default
``~/.cache/mbc``), keyed by a hash of every setting that shapes them, so a second run reuses them;
an interrupted training resumes from its last checkpoint. MAC starts from MBC's state at the end of
its float-memory warm start (the two compute the same until MBC's codebook is fitted), and both
reuse what the frozen LLM and encoders made of the training rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mbc import __version__
from mbc import data as qa_data
from mbc.config import MBCConfig
from mbc.errors import MBCError
from mbc.evaluation.online import DEFAULT_METHODS, EvalConfig, run_eval
from mbc.paths import cache_dir
from mbc.presets import preset
from mbc.training.activations import FrozenStore
from mbc.training.trainer import FLOAT_MEMORY_STATE, TrainConfig, train


@dataclass
class MainJobConfig:
    data: str = "generated"
    # Each of MBC and MAC: the cpu preset's warm start (600 probe steps) and 300 QA steps. A number
    # of steps, not minutes, so that the result is the same on a slower machine.
    max_steps: int = 900
    documents: int = 50  # test documents streamed (6 questions each)
    # None: one step, nothing asked again (at 50 documents retention is 100% by construction, and
    # asking again costs ~20 s); `mbc retention` measures it on a long stream.
    retention_every: int | None = None
    # Not "base, raw question": it scores ~0 on fictional documents, as the worked examples do, and
    # costs ~20 s; `mbc eval` runs it.
    methods: tuple[str, ...] = tuple(m for m in DEFAULT_METHODS if m != "base, raw question")
    output: str = "runs/main"


def _adapter_folder(
    name: str, model_config: MBCConfig, train_config: TrainConfig, job: MainJobConfig, start_from: Path | None = None
):
    """The cache folder of an adapter, named by a hash of every setting that shapes it (and of the
    state it started from)."""
    settings = {
        "model": model_config.to_dict(),
        "train": asdict(train_config),
        "data": job.data,
        "version": __version__,
        "start_from": start_from and start_from.parent.name,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "trained" / f"{name}-{digest}", settings


def _adapter_settings(quantize: bool, job: MainJobConfig) -> tuple[MBCConfig, TrainConfig]:
    chosen = preset("cpu")
    model_config = MBCConfig(**{**chosen["model"], "quantize": quantize})
    # Only `last` is used: no best-* copies (~570 MB each) in the cache. No validation of its own:
    # the main job evaluates both adapters on its test documents.
    train_config = TrainConfig(
        **{
            **chosen["train"],
            "max_steps": job.max_steps,
            "eval_every": 10**9,
            "eval_questions": 0,
            "save_best": False,
            "keep_float_memory_state": quantize,
            # The in-training reading gap (an extra forward every 5th step) shows in no result of
            # the job, and measuring it leaves training as it is (objectives.py): 8-11% of the QA
            # steps' time less (bench/train_step.py).
            "gap_every": 0,
        }
    )
    return model_config, train_config


def _mac_start(job: MainJobConfig) -> Path:
    """Where MAC starts: MBC's float-memory state."""
    folder, _ = _adapter_folder("mbc", *_adapter_settings(True, job), job)
    return folder / FLOAT_MEMORY_STATE


def cached_adapter(quantize: bool = True, job: MainJobConfig | None = None) -> Path | None:
    """The checkpoint of the main job's trained MBC (or, quantize=False, MAC) adapter, if `mbc run` made one."""
    job = job or MainJobConfig()
    name = "mbc" if quantize else "mac"
    start = None if quantize else _mac_start(job)
    folder, _ = _adapter_folder(name, *_adapter_settings(quantize, job), job, start)
    return folder / "last" if (folder / "done.json").exists() else None


def _train_or_reuse(
    name: str,
    model_config: MBCConfig,
    train_config: TrainConfig,
    splits: dict,
    job: MainJobConfig,
    store: FrozenStore | None = None,
    start_from: Path | None = None,
) -> Path:
    """Train into the adapter's cache folder; reuse it when it is complete."""
    folder, settings = _adapter_folder(name, model_config, train_config, job, start_from)
    done = folder / "done.json"
    if not done.exists():
        train_config.output_dir = str(folder)
        metrics = train(model_config, train_config, splits["train"], splits["validation"], store, start_from)
        done.write_text(json.dumps({"validation": metrics, "settings": settings}, indent=2))
    else:
        print(f"reusing the trained {name.upper()} adapter in {folder}")
    return folder / "last"


def run_main_job(job: MainJobConfig | None = None) -> dict:
    from mbc.model import MBCModel

    job = job or MainJobConfig()
    splits = qa_data.load_splits(job.data)
    checkpoints, store = {}, FrozenStore()  # MAC reuses what the frozen LLM and encoders made of MBC's rows
    for name, quantize in (("mbc", True), ("mac", False)):
        model_config, train_config = _adapter_settings(quantize, job)
        start = None if quantize else _mac_start(job)
        checkpoints[name] = _train_or_reuse(name, model_config, train_config, splits, job, store, start)
    rows = qa_data.first_documents(splits["test"], job.documents)
    mbc = MBCModel.from_pretrained(checkpoints["mbc"]).eval()
    mac = MBCModel.from_pretrained(checkpoints["mac"]).eval()
    return run_eval(
        mbc,
        rows,
        qa_data.documents(splits["train"]),
        job.output,
        EvalConfig(retention_every=job.retention_every or job.documents, methods=list(job.methods)),
        mac,
        notes={"checkpoints": {k: str(v) for k, v in checkpoints.items()}},
    )


# What a user of the default model must know: it reads only what fictional documents taught it.
DEFAULT_MODEL_NOTE = (
    "using the main job's MBC adapter, trained on generated fictional documents: it answers their "
    "kind of closed-list facts from memory, not names, numbers or real text; for real text train one on "
    "SQuAD-format data with `mbc train --preset cpu-text --data FILE.json` and pass it with --model "
    "(or $MBC_MODEL)"
)


def model_or_default(model: str | Path | None, say=None) -> Path:
    """``model`` if one is given, else the main job's cached adapter (``default_model``), after
    passing to ``say`` (a print function, or None) what the model was trained on (for the main job's
    adapter ``DEFAULT_MODEL_NOTE``)."""
    if model:
        if say is not None:
            from mbc import checkpoint

            about = checkpoint.trained_on(model)
            say(
                f"using the model in {model}, "
                + (f"trained on {about}" if about else "whose training data is not recorded")
            )
        return Path(model)
    found = default_model()
    if say is not None:
        say(f"{DEFAULT_MODEL_NOTE} ({found})")
    return found


def default_model() -> Path:
    """The MBC adapter the main job (`mbc run`) trained and cached, or a message saying how to get one."""
    found = cached_adapter()
    if found is None:
        raise MBCError(
            "no trained model given and none cached: pass --model CHECKPOINT (a folder from `mbc train`), "
            "or run `mbc run` once (about 15 minutes on 2 cores), which trains and caches the default adapter"
        )
    return found
