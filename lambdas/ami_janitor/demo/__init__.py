"""The local demo: an EC2 emulator (moto with the AMI calls it lacks) and the tools that run against it."""
