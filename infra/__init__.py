"""CDK infrastructure of ami-janitor: one self-contained stack per managed region."""
