from crctl.cli import main

main()
