"""loraflow: the Airflow side of the pipeline (params, data checks, preprocessing, trainer
launch, MLflow registration, teardown, UI plugin).

Never imports torch, transformers, peft, bitsandbytes or opacus: the training stack lives
in the trainer image. The job spec (``loraflow_trainer.spec``) is the one shared module.
"""

__version__ = "0.1.0"
