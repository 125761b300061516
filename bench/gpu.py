"""The CUDA code paths and the paper's configurations on one GPU, in one command.

    python bench/gpu.py [--out gpu.json] [--sections parity,shapes,serving] [--steps 5]
    python bench/gpu.py --smoke        # the same code on the CPU at toy sizes, in seconds (tested)

1. parity: tiny models built in code (tests/conftest.py), each built once on the CPU and copied
   to the GPU: the training loss, gradients and one optimizer step; the real trainer (accelerate
   puts it on the GPU) for a few steps, its checkpoint saved and loaded; ingest into a bank; answers
   with greedy and diverse beam search, through the code-count and the retrieval readers; and the
   NF4 load path (bitsandbytes) on a tiny Llama. GPU against CPU: max differences and equal counts.
2. shapes: each reference preset (presets.py) at its shapes with random weights:
   DistilGPT2 + T5-small, GPT2-Large + T5-base, GPT2-XL + T5-large / T5-base, Llama-2-7B + T5-large /
   T5-base with the LLM in 4-bit NF4 (bf16 where bitsandbytes is missing; the table says which).
   The reference's batch size, bf16 autocast, backprop dropout; seconds per step, tokens per
   second, peak GPU memory, and the time of one optimizer update at its batch x accumulation.
3. serving: at the DistilGPT2 and Llama-2-7B shapes, documents per second into a bank (compress and
   store), and questions per second with greedy and diverse beam search against banks of 1,000
   and 100,000 documents (the 99,000 beyond the first 1,000 are random codes written straight into
   the bank: reading cost depends on the codes' count, not on where they came from).

Texts are random words of a word-level tokenizer built in code (one word, one token): documents of
192 tokens (about a SQuAD paragraph), questions of 12, answers of 3. Nothing is downloaded; on a GPU
machine without this project's pinned packages, carry them as wheels (docs/RESULTS.md, "GPU").
Writes one JSON (--out) and prints one table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the tiny models of the test suite

NEEDED = {"transformers": "5.24", "accelerate": "1.0", "safetensors": "0.4", "gguf": "0.10", "tqdm": "4.66"}
DOC_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS, WORDS = 192, 12, 3, 30_000
ANSWER_ROUNDS = 3  # timed rounds of answering per bank and decoding; the median is reported

# name: (LLM family and shape, document encoder, question encoder); the preset gives the rest
T5_SHAPES = {  # d_model, d_ff, layers, heads
    "t5-small": (512, 2048, 6, 8),
    "t5-base": (768, 3072, 12, 12),
    "t5-large": (1024, 4096, 24, 16),
}
LLM_SHAPES = {
    "distilgpt2": ("gpt2", dict(n_layer=6, n_embd=768, n_head=12, vocab_size=50257)),
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257)),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257)),
    "llama-2-7b": (
        "llama",
        dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000),
    ),
}
SMOKE_T5 = (32, 64, 2, 4)
SMOKE_LLM = {
    "gpt2": dict(n_layer=16, n_embd=32, n_head=4, vocab_size=WORDS + 3),
    "llama": dict(
        num_hidden_layers=16, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=WORDS + 3
    ),
}


# ---- first seconds: is everything there? -----------------------------------------------------
def preflight(smoke: bool) -> dict:
    """Versions of what the run needs; one line and exit 2 if something is missing or too old."""
    from importlib.metadata import PackageNotFoundError, version

    problems, found = [], {}
    for name, least in NEEDED.items():
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if _version_tuple(found[name]) < _version_tuple(least):
            problems.append(f"{name} {found[name]} is older than {least}")
    import torch

    if not smoke and not torch.cuda.is_available():
        problems.append("no CUDA device is visible to torch (use --smoke on a CPU)")
    try:
        import mbc  # noqa: F401
    except ImportError as error:
        problems.append(f"mbc does not import ({error})")
    if problems:
        raise SystemExit(f"bench/gpu.py: {'; '.join(problems)}: carry the wheels listed in docs/RESULTS.md, 'GPU'")
    try:
        found["bitsandbytes"] = version("bitsandbytes")
    except PackageNotFoundError:
        found["bitsandbytes"] = None
    found["torch"] = torch.__version__
    return found


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:3])


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpu_memory_gb": round(properties.total_memory / 1024**3, 1)}
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ---- 1. parity: the same tiny model on the CPU and the GPU ------------------------------------
def parity(device: str, nf4: bool) -> list[dict]:
    import torch
    from conftest import ANSWERS, DOCUMENTS, MORE_DOCUMENTS, QUESTIONS, TINY_MODELS, byte_tokenizer, tiny_config

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare full float32
    folder = Path(tempfile.mkdtemp(prefix="mbc-gpu-"))
    paths = {}
    for family, make in TINY_MODELS.items():
        torch.manual_seed(0)
        make().save_pretrained(folder / family)
        byte_tokenizer().save_pretrained(folder / family)
        paths[family] = str(folder / family)
    documents = DOCUMENTS + MORE_DOCUMENTS
    checks = []
    for llm, encoder in (("llama", "bert"), ("gpt2", "t5")):
        pair = f"{llm}+{encoder}"
        checks += _parity_of_steps(pair, tiny_config(paths, llm, encoder), device, documents, QUESTIONS, ANSWERS)
        retrieval = dict(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4)
        for options in ({}, retrieval):
            config = tiny_config(paths, llm, encoder, **options)
            checks += _parity_of_answers(pair, config, device, documents, QUESTIONS, folder)
    checks.append(_guarded_check("gpt2+bert", "trainer: 4 steps, save, load", _trainer_on, device, paths, folder))
    if nf4:
        checks.append(_guarded_check("llama", "NF4 load (bitsandbytes)", _nf4_load, paths["llama"], QUESTIONS))
    return checks


def _guarded_check(pair: str, what: str, function, *args) -> dict:
    result = _guarded(function, *args)
    return _check(pair, what, 1.0, 0.0, result["error"]) if "error" in result else result


def _twins(config, device: str):
    """The same freshly built model on the CPU and (a copy) on ``device``."""
    import torch

    from mbc import MBCModel

    torch.manual_seed(0)
    cpu = MBCModel.build(config)
    return cpu, copy.deepcopy(cpu).to(device)


def _parity_of_steps(pair, config, device, documents, questions, answers) -> list[dict]:
    """Loss, gradients, and the loss after one Adam step, on both devices (eval mode: no dead-code
    resets, whose random picks differ between devices)."""
    import torch

    losses, gradients = {}, {}
    for name, model in zip(("cpu", device), _twins(config, "cpu" if device == "cpu" else device)):
        model.eval()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        first = model(documents[:2], questions, answers, [0, 1])
        first.loss.backward()
        gradients[name] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            second = model(documents[:2], questions, answers, [0, 1])
        losses[name] = (first.loss.item(), second.loss.item())
    cpu, other = losses["cpu"], losses[device]
    worst = max((gradients["cpu"][n] - g).abs().max().item() for n, g in gradients[device].items())
    scale = max(g.abs().max().item() for g in gradients["cpu"].values())
    return [
        _check(pair, "loss", abs(cpu[0] - other[0]), 1e-4, f"{cpu[0]:.6f} / {other[0]:.6f}"),
        _check(pair, "gradients", worst / scale, 1e-3, f"{len(gradients[device])} tensors, max |diff| / max |grad|"),
        _check(pair, "loss after an Adam step", abs(cpu[1] - other[1]), 1e-3, f"{cpu[1]:.6f} / {other[1]:.6f}"),
    ]


def _parity_of_answers(pair, config, device, documents, questions, folder: Path) -> list[dict]:
    """Save / load on the device, ingest into a bank, answer by greedy and diverse beam search."""
    from mbc import DecodingConfig, MBCModel
    from mbc.bank import BankLayout, MemoryBank
    from mbc.memory.ingest import ingest
    from mbc.memory.readers import answer_from_bank, reader_for

    cpu, other = _twins(config, "cpu" if device == "cpu" else device)
    if cpu.retrieval_keys is not None:
        cpu.retrieval_keys.fit(documents)
        other.retrieval_keys.load_state_dict(cpu.retrieval_keys.state_dict())
    saved = folder / f"{pair}-{config.retrieval_top_k}"
    other.save_pretrained(saved)
    loaded = MBCModel.from_pretrained(saved, device=device).eval()
    state = cpu.state_dict()
    drift = max((state[n].float() - t.float().cpu()).abs().max().item() for n, t in loaded.state_dict().items())
    reader_kind = "retrieval" if cpu.retrieval_keys is not None else "counts"
    results = {"save/load": None}
    for name, model in (("cpu", cpu.eval()), (device, loaded)):
        bank = MemoryBank.in_memory(BankLayout.of(model))
        ingest(model, bank, documents)
        reader = reader_for(model, bank)
        answers = {
            kind: answer_from_bank(model, reader, questions, DecodingConfig(kind, max_new_tokens=8))
            for kind in ("greedy", "diverse_beam")
        }
        results[name] = (bank.entries(), answers, reader.modulation(questions).float().cpu())
    (codes, answers, modulation), (codes_on, answers_on, modulation_on) = results["cpu"], results[device]
    same_codes = float((codes == codes_on).all(axis=-1).mean())
    label = f"{pair}, {reader_kind} reader"
    checks = [
        _check(label, "save -> load on the device", drift, 0.0, "max |diff| of the loaded weights"),
        _check(label, "ingest: codes equal", 1 - same_codes, 0.0, f"{same_codes:.0%} of {len(codes)} documents"),
        _check(label, "modulation", (modulation - modulation_on).abs().max().item(), 1e-4, "max |diff|"),
    ]
    for kind in answers:
        equal = sum(a == b for a, b in zip(answers[kind], answers_on[kind]))
        checks.append(_check(label, f"{kind} answers equal", len(questions) - equal, 0, f"{equal} of {len(questions)}"))
    return checks


def _trainer_on(device: str, paths: dict, folder: Path) -> dict:
    """The real trainer (it puts the model where accelerate finds a device) for 4 steps; its last
    checkpoint loads and answers."""
    from conftest import tiny_config

    from mbc import MBCModel
    from mbc.data import split_by_group
    from mbc.data.generated import generate_examples
    from mbc.training.trainer import TrainConfig, train

    rows = split_by_group(generate_examples(30, seed=1), {"train": 0.8, "validation": 0.2})
    settings = dict(batch_size=4, learning_rate=3e-3, max_steps=4, eval_every=4, log_every=1, eval_questions=6, seed=0)
    out = folder / "trained"
    start = time.perf_counter()
    metrics = train(tiny_config(paths, "gpt2", "bert"), TrainConfig(output_dir=str(out), **settings), *rows.values())
    loaded = MBCModel.from_pretrained(out / "last", device=device)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    return _check(
        "gpt2+bert",
        "trainer: 4 steps, save, load",
        0.0 if loaded.device.type == device.split(":")[0] else 1.0,
        0.0,
        f"on {loaded.device}, loss {last['loss']:.4f}, validation EM {metrics['em']:.1f}, "
        f"{time.perf_counter() - start:.1f} s",
    )


def _nf4_load(llama_folder: str, questions: list[str]) -> dict:
    """backbones.load_llm's NF4 path (bitsandbytes, device_map to GPU 0) on the tiny Llama."""
    import torch

    from mbc.network.backbones import load_llm

    backbone = load_llm(llama_folder, "nf4")
    linear = backbone.model.model.layers[0].self_attn.q_proj
    ids = backbone.tokenizer(questions, return_tensors="pt", padding=True)["input_ids"].to("cuda")
    with torch.no_grad():
        logits = backbone.model(ids).logits
    finite = bool(torch.isfinite(logits).all())
    return _check("llama", "NF4 load (bitsandbytes)", 0.0 if finite else 1.0, 0.0, f"{type(linear).__name__}")


def _check(pair: str, what: str, difference: float, tolerance: float, detail: str) -> dict:
    return {
        "models": pair,
        "check": what,
        "difference": difference,
        "passed": difference <= tolerance,
        "detail": detail,
    }


# ---- shapes: random models at the reference presets' sizes -------------------------------------
def word_tokenizer():
    """One token per word "w0" .. "w29999", so that a text's length in tokens is its word count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def texts(count: int, words: int, seed: int) -> list[str]:
    draw = random.Random(seed)
    return [" ".join(f"w{draw.randrange(WORDS)}" for _ in range(words)) for _ in range(count)]


def shaped_model(preset_name: str, device: str, smoke: bool, nf4: bool):
    """An MBC model at a preset's shapes, random weights, built on ``device``; and what its LLM holds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5Model

    from mbc import MBCConfig, MBCModel
    from mbc.network.backbones import Backbone
    from mbc.network.frozen_llm import FrozenLLM
    from mbc.presets import preset

    values = preset(preset_name)["model"]
    family, shape = LLM_SHAPES[preset_name]
    shape = SMOKE_LLM[family] if smoke else shape
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        if family == "gpt2":
            llm = GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=1, eos_token_id=1, pad_token_id=0, **shape))
            held = "float32 weights" + (", bf16 autocast" if device != "cpu" else "")
        else:
            torch.set_default_dtype(torch.bfloat16 if device != "cpu" else torch.float32)  # 7B in float32: 27 GB
            try:
                llm = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=1, pad_token_id=0, **shape))
            finally:
                torch.set_default_dtype(torch.float32)
            held = "bf16 weights (no bitsandbytes)" if device != "cpu" else "float32 (smoke)"
            if nf4:
                held = f"4-bit NF4 ({_to_nf4(llm)} linear layers), bf16 compute"
        encoders = {}
        for name in dict.fromkeys((values["document_encoder"], values["question_encoder"])):
            width, ff, layers, heads = SMOKE_T5 if smoke else T5_SHAPES[name]
            config = T5Config(vocab_size=32128, d_model=width, d_ff=ff, d_kv=64, num_layers=layers, num_heads=heads)
            encoders[name] = Backbone(name, T5Model(config), tokenizer)
        values |= dict(llm=f"random:{preset_name}", document_encoder="random", question_encoder="random")
        if smoke:
            values |= dict(lora_layers=min(values["lora_layers"], 4))
        config = MBCConfig(**values)
        model = MBCModel(
            config,
            FrozenLLM.from_config(config, Backbone(f"random:{preset_name}", llm, tokenizer)),
            encoders[preset(preset_name)["model"]["document_encoder"]],
            encoders[preset(preset_name)["model"]["question_encoder"]],
        )
    return model, held


def _to_nf4(llm) -> int:
    """The decoder's linear layers as bitsandbytes 4-bit NF4 layers, as transformers' NF4 loading
    leaves them (the LM head stays bf16). Returns how many were replaced."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    linears = [
        (parent, name, child)
        for parent in llm.model.layers.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in linears:
        quantized = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device="meta",
        )
        weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4", module=quantized)
        quantized.weight = weight.to("cuda")  # quantizes it
        setattr(parent, name, quantized)
    torch.cuda.empty_cache()
    return len(linears)


def time_training(preset_name: str, device: str, smoke: bool, nf4: bool, steps: int) -> dict:
    """Seconds per training step at the preset's batch size (bf16 autocast on a GPU), peak memory."""
    import torch

    from mbc.presets import preset
    from mbc.training.objectives import StepObjective
    from mbc.training.schedule import Step
    from mbc.training.trainer import TrainConfig, make_optimizer

    start = time.perf_counter()
    model, held = shaped_model(preset_name, device, smoke, nf4)
    built = time.perf_counter() - start
    _reset_peak(device)  # the peak of training, not of building the random weights
    train = TrainConfig(**preset(preset_name)["train"])
    batch = 2 if smoke else train.batch_size
    model.train()
    optimizer = make_optimizer(model, train)
    objective = StepObjective(model)
    step_kind = Step(backprop_keep=train.backprop_keep)

    def step(seed: int) -> tuple[float, float]:
        documents = texts(batch, DOC_TOKENS, seed)
        questions, answers = texts(batch, QUESTION_TOKENS, seed + 1), texts(batch, ANSWER_TOKENS, seed + 2)
        _sync(device)
        began = time.perf_counter()
        with _bf16(device):
            out = objective(documents, questions, answers, list(range(batch)), step_kind)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - began, out.loss.item()

    step(0)  # warm-up: allocations, kernel selection
    timed = [step(seed) for seed in range(1, steps + 1)]
    per_step = sorted(seconds for seconds, _ in timed)[len(timed) // 2]  # the median
    tokens = batch * (DOC_TOKENS + QUESTION_TOKENS + ANSWER_TOKENS + 2)
    counts = model.parameter_counts()
    result = {
        "preset": preset_name,
        "llm": held,
        "batch": batch,
        "accumulation": train.grad_accumulation,
        "backprop_keep": train.backprop_keep,
        "seconds_per_step": per_step,
        "tokens_per_second": tokens / per_step,
        "seconds_per_update": per_step * train.grad_accumulation,
        "peak_gb": _peak_gb(device),
        "build_seconds": built,
        "trainable_parameters": counts["trainable"],
        "trainable_by_part": _trainable_by_part(model),
        "losses": [loss for _, loss in timed],
    }
    return result


def _trainable_by_part(model) -> dict[str, int]:
    parts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = "llm (KV-LoRA)" if name.startswith("llm.") else name.split(".")[0]
            parts[part] = parts.get(part, 0) + parameter.numel()
    return parts


# ---- 3. serving: adapting into a bank, answering from it -----------------------------------------
def time_serving(preset_name: str, device: str, smoke: bool, nf4: bool, sizes: tuple[int, ...]) -> list[dict]:
    import numpy as np

    from mbc import DecodingConfig
    from mbc.bank import BankLayout, MemoryBank
    from mbc.memory.ingest import ingest
    from mbc.memory.readers import answer_from_bank, reader_for

    model, held = shaped_model(preset_name, device, smoke, nf4)
    model.eval()
    _reset_peak(device)
    results = []
    folder = Path(tempfile.mkdtemp(prefix="mbc-gpu-bank-"))
    with MemoryBank.open(folder / "bank.db", BankLayout.of(model)) as bank:
        adapted = sizes[0]
        with _bf16(device):
            ingest(model, bank, texts(64, DOC_TOKENS, 6), batch_size=64)  # warm-up at the timed batch size
            _sync(device)
            start = time.perf_counter()
            ingest(model, bank, texts(adapted - 64, DOC_TOKENS, 8), batch_size=64)
        _sync(device)
        adapt_seconds = time.perf_counter() - start
        questions = texts(16 if smoke else 64, QUESTION_TOKENS, 9)
        draw = np.random.default_rng(0)
        for size in sizes:
            missing = size - len(bank)
            for start_at in range(0, missing, 10_000):  # random codes: what reading costs depends on their count
                count = min(10_000, missing - start_at)
                entries = draw.integers(0, model.config.codebook_size, (count, *bank.layout.entry_shape))
                bank.add(texts(count, 4, 1000 + size + start_at), entries.astype(np.uint32))
            reader = reader_for(model, bank)
            row = {"preset": preset_name, "llm": held, "bank_documents": len(bank)}
            row["adapt_documents_per_second"] = (adapted - 64) / adapt_seconds if size == sizes[0] else None
            for kind in ("greedy", "diverse_beam"):
                decoding = DecodingConfig(kind, max_new_tokens=8)
                rounds = []
                with _bf16(device):
                    for _ in range(1 + ANSWER_ROUNDS):  # the first: warm-up, and the reader's preparation
                        _sync(device)
                        start = time.perf_counter()
                        answer_from_bank(model, reader, questions, decoding)
                        _sync(device)
                        rounds.append(time.perf_counter() - start)
                row[f"{kind}_questions_per_second"] = len(questions) / sorted(rounds[1:])[ANSWER_ROUNDS // 2]
            row["peak_gb"] = _peak_gb(device)
            results.append(row)
    del model
    _free(device)
    return results


def _bf16(device: str):
    """bf16 autocast on a GPU, as the reference presets train; nothing on the CPU (--smoke)."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu")


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3 if device != "cpu" else None


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


# ---- the table ---------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    print(f"machine: {json.dumps(report['machine'])}")
    checks = report.get("parity", [])
    if checks:
        passed = sum(c["passed"] for c in checks)
        print(f"\nparity, {report['device']} against cpu: {passed} of {len(checks)} checks within tolerance")
        for c in checks:
            mark = "ok  " if c["passed"] else "FAIL"
            print(f"  {mark} {c['models']:<34}{c['check']:<32}{c['difference']:>10.2e}  {c['detail']}")
    if report.get("shapes"):
        print(
            f"\n{'preset':<12}{'LLM weights':<44}{'batch':>6}{'x acc':>6}{'s/step':>8}{'tok/s':>9}{'s/update':>9}{'peak GB':>9}"
        )
        for r in report["shapes"]:
            line = f"{r['preset']:<12}{r['llm'][:43]:<44}{r['batch']:>6}{r['accumulation']:>6}"
            if "error" in r:
                print(f"{line}  failed: {r['error']}")
                continue
            peak = f"{r['peak_gb']:>9.1f}" if r["peak_gb"] is not None else f"{'-':>9}"
            print(
                f"{line}{r['seconds_per_step']:>8.3f}{r['tokens_per_second']:>9.0f}{r['seconds_per_update']:>9.2f}{peak}"
            )
    if report.get("serving"):
        print(
            f"\n{'preset':<12}{'bank docs':>10}{'adapt docs/s':>14}{'greedy q/s':>12}{'div. beam q/s':>15}{'peak GB':>9}"
        )
        for r in report["serving"]:
            if "error" in r:
                print(f"{r['preset']:<12}  failed: {r['error']}")
                continue
            adapt = f"{r['adapt_documents_per_second']:>14.1f}" if r["adapt_documents_per_second"] else f"{'-':>14}"
            peak = f"{r['peak_gb']:>9.1f}" if r["peak_gb"] is not None else f"{'-':>9}"
            print(
                f"{r['preset']:<12}{r['bank_documents']:>10,}{adapt}{r['greedy_questions_per_second']:>12.1f}"
                f"{r['diverse_beam_questions_per_second']:>15.1f}{peak}"
            )


def _guarded(function, *args, **kwargs):
    """A section's result, or its failure as one line (the other sections still run)."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - a failed configuration is a result to report
        import traceback

        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="on the CPU at toy sizes (seconds): checks the script")
    parser.add_argument("--sections", default="parity,shapes,serving")
    parser.add_argument("--presets", default=",".join(LLM_SHAPES))
    parser.add_argument("--serving-presets", default="distilgpt2,llama-2-7b")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per preset (after one warm-up)")
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args()
    versions = preflight(args.smoke)
    device = "cpu" if args.smoke else "cuda"
    nf4 = versions["bitsandbytes"] is not None and device == "cuda"
    sections = args.sections.split(",")
    report = {"device": device, "machine": machine(), "versions": versions, "command": " ".join(sys.argv)}
    started = time.perf_counter()

    def save() -> None:  # after every piece: a run stopped at its time limit keeps what it measured
        report["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(report, indent=2))

    if "parity" in sections:
        checks = _guarded(parity, device, nf4)
        report["parity"] = checks if isinstance(checks, list) else [_check("all", "parity", 1.0, 0.0, checks["error"])]
        print(f"parity done at {time.perf_counter() - started:.0f} s", flush=True)
        save()
    if "shapes" in sections:
        report["shapes"] = []
        for name in args.presets.split(","):
            result = _guarded(time_training, name, device, args.smoke, nf4 and name == "llama-2-7b", args.steps)
            if "error" in result:
                result |= {"preset": name, "llm": "-", "batch": "-", "accumulation": "-"}
            report["shapes"].append(result)
            print(f"shapes {name} done at {time.perf_counter() - started:.0f} s", flush=True)
            save()
            _free(device)
    if "serving" in sections:
        report["serving"] = []
        sizes = (100, 200) if args.smoke else (1_000, 100_000)
        for name in args.serving_presets.split(","):
            rows = _guarded(time_serving, name, device, args.smoke, nf4 and name == "llama-2-7b", sizes)
            report["serving"] += rows if isinstance(rows, list) else [rows | {"preset": name}]
            print(f"serving {name} done at {time.perf_counter() - started:.0f} s", flush=True)
            save()
    save()
    print_table(report)
    failed = [c for c in report.get("parity", []) if not c["passed"]]
    failed += [r for r in report.get("shapes", []) + report.get("serving", []) if "error" in r]
    print(
        f"\n{'all passed' if not failed else f'{len(failed)} failed'}; {report['seconds']:.0f} s; written to {args.out}"
    )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
