"""Small helpers every layer uses: tensor trees, calling a model, paths, atomic files, sizes."""
