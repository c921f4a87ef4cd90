import sys

sys.exit("python -m serving: the model server is not built yet (see the serving issue)")
