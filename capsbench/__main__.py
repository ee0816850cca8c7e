from capsbench.cli import main

raise SystemExit(main())
