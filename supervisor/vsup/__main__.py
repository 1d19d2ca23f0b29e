from vsup.cli import main

raise SystemExit(main())
