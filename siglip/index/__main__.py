from siglip.index.cli import main

raise SystemExit(main())
