"""Running the Flower App: the simulation launcher, the deployment engine, the reaper, warm
workers, certificates, threads."""
