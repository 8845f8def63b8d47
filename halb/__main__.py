from halb.cli import main

main()
