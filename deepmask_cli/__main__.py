from deepmask_cli.cli.main import main

main()
