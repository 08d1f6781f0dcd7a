from fdkeeper.cli import main

main()
