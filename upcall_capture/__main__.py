from upcall_capture.cli import main

raise SystemExit(main())
