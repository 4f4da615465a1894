"""Exporting a hand as a rigged file for other programs: glTF 2.0 (``.glb``) with its skeleton, skin,
pose correctives as morph targets and animations (:mod:`common.export.gltf`); FBX through Blender's
Python module where it is installed (:mod:`common.export.fbx`)."""
