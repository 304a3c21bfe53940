"""``python -m hmtqa`` (and ``torchrun ... -m hmtqa``): the same as the ``hmtqa`` script."""

import sys

from hmtqa.main import main

sys.exit(main())
