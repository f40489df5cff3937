import sys

from memory3.train.run import main

sys.exit(main())
