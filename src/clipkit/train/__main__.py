from clipkit.train.app import main

main()
