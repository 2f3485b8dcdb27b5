"""``python -m attn_audit`` runs the CLI."""

from attn_audit.cli import main

raise SystemExit(main())
