import sys

from loraflow_trainer.cli import main

sys.exit(main())
