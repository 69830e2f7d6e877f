import sys

from modelnet.cli.main import main

sys.exit(main())
