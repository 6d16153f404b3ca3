import sys

from memcom_torchrec.export.cli import main

sys.exit(main())
