import sys

from imgsvc.cli import main

sys.exit(main())
