"""The hand model: its files, the default hand, pose files, forward kinematics and skinning."""
