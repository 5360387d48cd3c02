from histo.cli import entry

entry()
