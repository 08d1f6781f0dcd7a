from fdkeeper.cli import main

main(prog_name="fdkeeper")
