"""Protocol definitions of the gateway API (package ``parsimony.v1``) and their generated modules."""
