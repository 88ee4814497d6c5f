from clipkit.cli.main import main

raise SystemExit(main())
