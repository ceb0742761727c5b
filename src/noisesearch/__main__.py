import sys

from noisesearch.cli import main

sys.exit(main())
