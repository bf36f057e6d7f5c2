import sys

from gateway_daemon.cli import main

sys.exit(main())
