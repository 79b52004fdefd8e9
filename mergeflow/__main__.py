from mergeflow.cli import program

program()
