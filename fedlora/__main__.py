import sys

from fedlora.cli.main import main

sys.exit(main())
