from emu.demo.driver import main

main()
