"""`python -m data_prep.mnist|multimnist` in a checkout: thin aliases of capsdist.prep (what a wheel installs)."""
