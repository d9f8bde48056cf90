"""Everything the scripts need that is not the method (the method is lmd.py). One module per job:

    cli            one-line errors and exit status 2 for a mistake the user can fix
    vaes           opening the frozen VAE: error messages, offline check, provenance, fingerprint
    datasets       the datasets (CIFAR, MNIST, digits, image folders, a synthetic smoke test) and patch defaults
    latent_cache   every image encoded once by the frozen VAE and kept on disk
    sampling       data order, masks and augmentation as pure functions of (seed, step, rank)
    optim          weight-decay groups, the learning-rate schedule, layer-wise lr decay
    devices        device, precision, torchrun processes, compiled blocks, loader workers
    checkpoints    atomic saves, a pretraining run's checkpoint, loading with one-line errors
    pretraining    around train.py's loop: resume, the run directory, stop requests, batches, the held-out loss
    probes         frozen-encoder features, the kNN probe and the converged linear probe
    pictures       labelled reconstruction grids, curves, the schedules figure"""
