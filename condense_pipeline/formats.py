"""Every file name, column name and member suffix the project reads or writes, in one place."""

# Input shards (DESIGN.md section 9).
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
LABEL_SUFFIX = "cls"
DATASET_JSON = "dataset.json"
DATASET_FORMAT = 1
TRAIN, TEST = "train", "test"
VALIDATION = "validation"  # held out of the training images by `prepare`

# Rows of the decoded dataset that the reader gives Ray Data.
KEY = "key"
IMAGE = "image"  # uint8 [H, W, C] at the profile's resolution
LABEL = "label"  # int64; -1 on a rejected row
SHARD = "shard"
ERROR = "error"  # "" for a good sample, else why it was rejected

# Run directory.
MANIFEST = "manifest.json"
STATS_DIR = "stats"
BANK_JSON = "bank.json"
CONDENSE_DIR = "condense"
EXPORT_DIR = "export"
EVAL_DIR = "eval"
REPORT_JSON = "report.json"
BASELINE_JSON = "baseline.json"  # beside report.json: the keys each baseline run trained on
EVAL_RUNS_DIR = "runs"  # beside report.json: one file per finished training run, for a rerun

# Exported condensed set.
# 2: the Parquet image column is a struct {bytes, path} with Hugging Face features (was png bytes)
EXPORT_FORMAT = 2
PARQUET_COLUMNS = ("key", "label", "class_name", "image", "tensor")

# Inside an export folder (DESIGN.md section 9).
EXPORT_WDS_DIR = "wds"
EXPORT_PARQUET_DIR = "parquet"
EXPORT_SHARD_PREFIX = "condensed"
PREVIEW_PNG = "preview.png"
LOSS_PNG = "loss.png"
TENSOR_SHAPE_METADATA = "tensor_shape"  # Parquet schema metadata key: JSON [C, H, W]
HF_METADATA = "huggingface"  # Parquet schema metadata key that Hugging Face `datasets` reads
DATASET_CARD = "README.md"
REPORT_HTML = "report.html"
