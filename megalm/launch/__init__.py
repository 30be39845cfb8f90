"""Starting processes and finding each other: what every entry point (launcher/, `megalm`, benches, tests) shares.

    env.py       rank, world size and rendezvous from the launcher's environment (torchrun, deepspeed, srun,
                 mpirun, or none), and the default process group built from them
    watchdog.py  heartbeats in the rendezvous store, read when a collective fails, to name the rank that died
    slurm.py     `megalm slurm`: the sbatch script (template in templates/pretrain.sbatch)
    local.py     free_port() and spawn(): N CPU ranks over gloo on this machine, each rank's result returned

launcher/ is a thin layer over this package; nothing in megalm imports launcher/.
"""
