"""loraflow_trainer: the HuggingFace LoRA/QLoRA/DP-SGD backend that runs inside the trainer container.

Importing this package (and ``spec``/``errors``) must stay torch-free: the Airflow side
imports the job spec and exit codes from here.
"""

__version__ = "0.1.0"
