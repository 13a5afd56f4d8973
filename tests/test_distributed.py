from internvl_chat.distributed import dist_info, setup_environment


def test_plain_python_is_rank0_of_1():
    info = dist_info({})
    assert (info.launcher, info.rank, info.world_size, info.is_main) == ("none", 0, 1, True)


def test_torchrun_variables():
    info = dist_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        "torchrun", 3, 8, 1, 4)


def test_slurm_task_is_translated_to_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_NODELIST": "gpu[07-08]"}
    info = setup_environment(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        "slurm", 5, 16, 1, 8)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "29500"
    assert dist_info(env).launcher == "slurm"  # still known as a Slurm job once the torchrun variables exist


def test_sbatch_shell_with_one_task_is_not_distributed():
    # inside an sbatch script (no step yet) or a single task, the job is not a process group
    assert dist_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).launcher == "none"
    assert dist_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}).launcher == "none"


def test_torchrun_inside_slurm_wins():
    info = dist_info({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert info.launcher == "torchrun" and info.rank == 1


def test_heterogeneous_tasks_per_node():
    # 2 nodes of 8 tasks and one of 4: the task on node 2 is in a local world of 4, not a parse error
    env = {"SLURM_PROCID": "17", "SLURM_NTASKS": "20", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_NODELIST": "gpu[01-03]"}
    info = dist_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (17, 20, 1, 4)
    env["SLURM_NODEID"] = "1"
    assert dist_info(env).local_world_size == 8
