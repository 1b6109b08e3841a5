"""The `tandem` command line and the plumbing shared by its services."""
