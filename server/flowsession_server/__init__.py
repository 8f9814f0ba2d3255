"""flowsession server: runs identity-verification flow sessions over gRPC, stored in SQLite."""
