from ablations.cli import entry

entry()
