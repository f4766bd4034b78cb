"""loraflow's data wing: a dataset file is read once, then checked, then preprocessed.

    read.py        CSV/JSONL/Parquet -> ``Rows``: the frame (indexed by line number) and, per
                   format, the view of each slice that every rule and preprocessing step reads
                   (usable rows, keys, normalised keys, token-text sizes, the output table)
    keys.py        what makes two rows the same: Arrow kernels with Python's str semantics
                   (folding, JSON escaping), sha256 digests and first-seen dedup, split buckets
    checks.py      the data checks (pandera schema rules, then the content rules) and
                   data_report.json
    preprocess.py  dedup, the content-hash train/eval split, Parquet, the fingerprint

The check and preprocess tasks import ``loraflow.data.checks`` / ``loraflow.data.preprocess``
lazily: pandas, pandera and pyarrow are paid for only by the data tasks.
"""

from loraflow.data.keys import split_bucket
from loraflow.data.read import Rows, normalised_keys

__all__ = ["Rows", "normalised_keys", "split_bucket"]
