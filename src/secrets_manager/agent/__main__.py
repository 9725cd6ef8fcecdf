"""`python -m secrets_manager.agent`: the agent process (started by `secrets-manager agent start`)."""

import sys

from secrets_manager.agent.process import main

sys.exit(main())
