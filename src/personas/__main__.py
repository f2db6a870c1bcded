from personas.cli import main

raise SystemExit(main())
