"""Question-answering data: rows, loaders for the paper's formats, generated fictional documents."""

from mbc.data.examples import QAExample, documents, first_documents, split_by_group, standard_split
from mbc.data.loaders import describe_training, load, load_splits

__all__ = [
    "QAExample",
    "describe_training",
    "documents",
    "first_documents",
    "load",
    "load_splits",
    "split_by_group",
    "standard_split",
]
