import sys

from speakerlab.extract import main

sys.exit(main())
