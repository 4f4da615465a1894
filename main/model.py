"""The DeepHandMesh model: encoder, pose decoder, identity/pose correctives, FK and LBS.

Entry points (docs/design.md, "Entry points"): ``get_model(mode, hand_model)`` and ``model.decode(euler)``; the
training forward (``model(inputs, targets, meta_info, 'train')``) returns the per-element losses.
The template, the renderer's faces and the losses' tables live in non-persistent buffers, so a
state dict holds exactly the original's keys
(``id_code``, ``backbone_net.*``, ``pose_net.*``, ``skeleton_refine_net.*``, ``skin_refine_net.*``).

``get_decoder(hand_model)`` builds only what decoding angles into a mesh needs (the identity code
and the corrective networks): no encoder, and no training objective (renderer, penetration
tables, Laplacian), which the demo, the editor and the animation never use. Its state dict holds
the same keys as the full model's, less ``backbone_net.*`` and ``pose_net.*``.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from common.nets.module import BackboneNet, PoseNet, SkeletonRefineNet, SkinRefineNet
from common.hand.hand_model import HandModel
from common.hand.kinematics import KinematicTree, add_translation, forward_kinematics, linear_blend_skinning, pose_mesh
from main.config import cfg as default_cfg
from main.objective import TrainingObjective

# Tensors of a data-set sample that the model reads (DataParallel scatters them); the targets and
# cameras the training objective reads are main.objective's TARGET_KEYS and META_KEYS.
INPUT_KEYS = ("img",)


class Identity(NamedTuple):
    """What the subject's identity code fixes, whatever the pose (:meth:`Model.identity`). Compute it
    once and pass it to :meth:`Model.decode` or :meth:`Model.pose` to pose one subject many times."""

    local_pose: torch.Tensor             # [J, 4, 4] local rest poses with the skeleton corrective (mm)
    template_pose: torch.Tensor          # [J, 4, 4] global rest poses G' of that skeleton (template root)
    pose_independent_rest: torch.Tensor  # [3V] template + identity corrective + pose layer's bias (mm)


class PosedHand(NamedTuple):
    """A batch of posed hands (:meth:`Model.pose`), mm."""

    joints: torch.Tensor         # [B, J, 3]
    mesh: torch.Tensor           # [B, V, 3] skinned
    rest_mesh: torch.Tensor      # [B, V, 3] template + pose and identity correctives, before skinning
    template_pose: torch.Tensor  # [J, 4, 4] G' of the refined skeleton


class Model(nn.Module):
    def __init__(
        self,
        backbone_net: Optional[BackboneNet],
        pose_net: Optional[PoseNet],
        skeleton_refine_net: SkeletonRefineNet,
        skin_refine_net: SkinRefineNet,
        hand_model: HandModel,
        id_code_dim: int = 32,
        config=None,
        objective: bool = True,
    ):
        """``backbone_net`` and ``pose_net`` are None in a decoder (:func:`get_decoder`);
        ``objective`` False leaves out the training objective (``self.objective`` is None)."""
        super().__init__()
        config = config or default_cfg
        self.hand_model = hand_model
        self.joint_num = hand_model.joint_num
        self.vertex_num = hand_model.vertex_num
        self.root_joint_idx = hand_model.root_index
        self.align_joint_idx = hand_model.align_joint_indices
        self.non_rigid_joint_idx = hand_model.non_rigid_joint_indices
        self.kinematic_tree = KinematicTree.from_parents(hand_model.parents)

        # The subject's identity: a fixed random code, saved with the weights but never trained.
        self.register_buffer("id_code", torch.randn(id_code_dim))

        self.backbone_net = backbone_net
        self.pose_net = pose_net
        self.skeleton_refine_net = skeleton_refine_net
        self.skin_refine_net = skin_refine_net

        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        for name, value in (
            ("template_vertices", f32(hand_model.vertices)),  # [V, 3] mm
            ("skinning_weight", f32(hand_model.skinning_weights)),  # [V, J]
            ("local_pose", f32(hand_model.local_pose)),  # [J, 4, 4]
            ("global_pose", f32(hand_model.global_pose)),  # [J, 4, 4]
            ("global_pose_inv", f32(hand_model.global_pose_inv)),  # [J, 4, 4]
            ("faces", torch.as_tensor(hand_model.faces, dtype=torch.long)),  # [F, 3]
            ("segmentation", torch.as_tensor(hand_model.segmentation, dtype=torch.long)),  # [V]
        ):
            self.register_buffer(name, value, persistent=False)

        # Training: root alignment, the depth renderer and the losses. A submodule, so that
        # ``.to(device)`` and DataParallel's replication carry their tables; their buffers are
        # non-persistent, so the state dict keeps exactly the original's keys (docs/design.md, "Checkpoints").
        self.objective = TrainingObjective(hand_model, self.faces, config) if objective else None

    # ---------------------------------------------------------------- pieces
    def refined_local_pose(self) -> torch.Tensor:
        """``[J, 4, 4]`` local poses with the identity's skeleton corrective (mm) added to the translations."""
        return add_translation(self.local_pose, self.skeleton_refine_net(self.id_code))

    def refined_template_pose(self, local_refined: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[J, 4, 4]`` global rest poses of the refined skeleton (no rotation, template root)."""
        if local_refined is None:
            local_refined = self.refined_local_pose()
        root = self.global_pose[self.root_joint_idx]
        return forward_kinematics(local_refined[None], root, self.kinematic_tree)[0]

    def identity(self) -> Identity:
        """The pose-independent part of the decoder for this model's identity code (see :class:`Identity`)."""
        local = self.refined_local_pose()
        return Identity(local, self.refined_template_pose(local),
                        self.skin_refine_net.pose_independent_rest(self.template_vertices, self.id_code))

    def rest_vertices(self, joint_euler: torch.Tensor, identity: Optional[Identity] = None) -> torch.Tensor:
        """``[B, V, 3]`` template + pose corrective + identity corrective (mm), in the rest pose."""
        identity = self.identity() if identity is None else identity
        return self.skin_refine_net.corrected_vertices(joint_euler.detach(), identity.pose_independent_rest)

    def pose(self, joint_euler: torch.Tensor, root_transform: torch.Tensor,
             identity: Optional[Identity] = None) -> PosedHand:
        """Correctives, forward kinematics and skinning.

        Args:
            joint_euler: ``[B, J, 3]`` Euler angles (radians).
            root_transform: ``[B, 4, 4]`` or ``[4, 4]`` global transform of the root joint.
            identity: :meth:`identity`, computed here when None.
        Returns:
            :class:`PosedHand` (mm).
        """
        if joint_euler.dim() != 3 or joint_euler.shape[1:] != (self.joint_num, 3):
            raise ValueError(
                f"joint_euler: expected shape [B, {self.joint_num}, 3] (radians), got {tuple(joint_euler.shape)}"
            )
        identity = self.identity() if identity is None else identity
        rest_mesh = self.rest_vertices(joint_euler, identity)
        G, mesh = pose_mesh(joint_euler, identity.local_pose, root_transform, rest_mesh, self.skinning_weight,
                            self.global_pose_inv, self.kinematic_tree)
        return PosedHand(G[..., :3, 3], mesh, rest_mesh, identity.template_pose)

    @torch.no_grad()
    def skinned_rest_mesh(self, rest_mesh: torch.Tensor, template_pose: torch.Tensor) -> torch.Tensor:
        """The penetration loss's reference surface (the original's ``mesh_refined_v``, detached).

        The corrected rest mesh skinned by the refined skeleton at zero angles,
        ``T_j = G'_j · global_pose_inv_j``: it sits on the bones the radii are measured from, which
        the un-skinned mesh does not when the skeleton corrective moves joints.

        Args:
            rest_mesh: ``[B, V, 3]`` template + pose + identity correctives (mm).
            template_pose: ``[J, 4, 4]`` refined template poses ``G'`` (template root).
        Returns:
            ``[B, V, 3]`` (mm), without gradient.
        """
        transforms = (template_pose @ self.global_pose_inv)[None]
        return linear_blend_skinning(rest_mesh, self.skinning_weight, transforms).contiguous()

    @torch.no_grad()
    def zero_correctives(self) -> None:
        """Make the skeleton and skin correctives exactly zero (the template as it is), by zeroing
        the last layer of each corrective network."""
        for seq in (self.skeleton_refine_net.fc_skeleton, self.skin_refine_net.fc_pose, self.skin_refine_net.fc_id):
            seq[-1].weight.zero_()
            seq[-1].bias.zero_()

    def corrective_layers(self) -> Dict[str, nn.Sequential]:
        """The three corrective networks by the names of ``cfg.correctives``."""
        return {"skeleton": self.skeleton_refine_net.fc_skeleton, "identity": self.skin_refine_net.fc_id,
                "pose": self.skin_refine_net.fc_pose}

    @torch.no_grad()
    def hold_at_zero(self, names) -> None:
        """Hold the named correctives (``'skeleton'``, ``'identity'``, ``'pose'``) at exactly zero:
        their last layer is zeroed and their parameters stop learning (``requires_grad`` off)."""
        layers = self.corrective_layers()
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(f"correctives: unknown {unknown}; expected some of {sorted(layers)}")
        for name in names:
            layers[name][-1].weight.zero_()
            layers[name][-1].bias.zero_()
            layers[name].requires_grad_(False)

    # ------------------------------------------------------------ interfaces
    def decode(self, joint_euler: torch.Tensor, identity: Optional[Identity] = None) -> Dict[str, torch.Tensor]:
        """Angles → mesh with the root at identity (the output lives in the wrist's frame).

        Args:
            joint_euler: ``[B, J, 3]`` Euler angles in radians.
            identity: :meth:`identity` (computed here when None; pass it when decoding many poses).
        Returns:
            ``{'joint_out': [B, J, 3], 'mesh_out_refined': [B, V, 3]}`` in mm (the original's keys).
        """
        root = torch.eye(4, dtype=joint_euler.dtype, device=joint_euler.device)
        hand = self.pose(joint_euler, root, identity)
        return {"joint_out": hand.joints, "mesh_out_refined": hand.mesh}

    def angles(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, J, 3]`` Euler angles (radians): the encoder's reading of ``inputs['img']``, or,
        decoder-only (``cfg.pose_source='gt'``), the given ``inputs['joint_euler']``."""
        joint_euler = inputs.get("joint_euler")
        if joint_euler is not None:
            return joint_euler
        if self.backbone_net is None:
            raise RuntimeError("this model is a decoder (get_decoder): it has no encoder to read images; "
                               "build it with get_model")
        return self.pose_net(self.backbone_net(inputs["img"]))

    def pose_on_keypoints(self, joint_euler: torch.Tensor, joint_world: torch.Tensor,
                          joint_valid: torch.Tensor) -> Tuple[PosedHand, torch.Tensor]:
        """The training forward's posing: the root placed by the objective's alignment of the refined
        template onto the keypoints (:meth:`main.objective.TrainingObjective.root_alignment`).

        Args:
            joint_euler: ``[B, J, 3]`` radians; joint_world: ``[B, J, 3]`` keypoints (mm);
            joint_valid: ``[B, J]``, 1 where a keypoint exists.
        Returns:
            ``(PosedHand, placed [B] bool)``.
        """
        identity = self.identity()
        dtype = joint_euler.dtype
        root, placed = self.objective.root_alignment(identity.template_pose, joint_world.to(dtype),
                                                     joint_valid.to(dtype))
        return self.pose(joint_euler, root, identity), placed

    def forward(self, inputs: Dict[str, torch.Tensor], targets: Optional[Dict[str, torch.Tensor]] = None,
                meta_info: Optional[Dict[str, torch.Tensor]] = None, mode: str = "test"):
        """Image → angles → mesh; in ``'train'`` mode the training objective's losses.

        Args:
            inputs: ``{'img': [B, 3, H, W]}``, the crop with values in [0, 1]; or, decoder-only,
                ``{'joint_euler': [B, J, 3]}`` angles (radians) used instead of the encoder's.
            targets, meta_info: (``'train'``) as :meth:`main.objective.TrainingObjective.forward`.
            mode: ``'train'`` or ``'test'``.
        Returns:
            ``'test'``: the root at identity, as :meth:`decode`: ``joint_out [B, J, 3]``,
            ``mesh_out_refined [B, V, 3]`` (mm) and ``joint_euler [B, J, 3]``.
            ``'train'``: the per-element losses of :class:`main.objective.TrainingObjective`.
        """
        if mode not in ("train", "test"):
            raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
        if mode == "train" and self.objective is None:
            raise RuntimeError("this model was built without its training objective (get_decoder); "
                               "build it with get_model('train', ...)")
        joint_euler = self.angles(inputs)
        if mode == "test":
            out = self.decode(joint_euler)
            out["joint_euler"] = joint_euler
            return out
        self.objective.check(targets, meta_info)
        hand, placed = self.pose_on_keypoints(joint_euler, targets["joint_world"], targets["joint_valid"])
        return self.objective(hand, self.skinned_rest_mesh(hand.rest_mesh, hand.template_pose), targets, meta_info,
                              placed)


def init_weights(m: nn.Module) -> None:
    """The original's initialisation of the decoder layers."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, std=0.001)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.01)
        nn.init.constant_(m.bias, 0)


def get_model(mode: str, hand_model: HandModel, config=None) -> Model:
    """Build the model for a hand template.

    Args:
        mode: ``'train'`` (decoder layers initialised as the original; backbone from
            ``config.pretrained_backbone`` when given) or ``'test'``.
        hand_model: a loaded :class:`HandModel` (see :func:`common.hand.hand_model.load_hand_model`).
        config: a :class:`main.config.Config`; the global ``cfg`` when None.
    """
    if mode not in ("train", "test"):
        raise ValueError(f"get_model: mode must be 'train' or 'test', got {mode!r}")
    config = config or default_cfg
    backbone_net = BackboneNet(config.resnet_type, config.backbone_img_feat_dim, channels_last=config.channels_last,
                               bf16=config.encoder_bf16)
    pose_net = PoseNet(torch.from_numpy(hand_model.dof_mask), config.backbone_img_feat_dim)
    skeleton_refine_net = SkeletonRefineNet(hand_model.joint_num, config.id_code_dim)
    skin_refine_net = SkinRefineNet(hand_model.joint_num, hand_model.vertex_num, config.id_code_dim)
    if mode == "train":
        backbone_net.init_weights(config.pretrained_backbone)
        for net in (pose_net, skeleton_refine_net, skin_refine_net):
            net.apply(init_weights)
    return Model(backbone_net, pose_net, skeleton_refine_net, skin_refine_net, hand_model, config.id_code_dim,
                 config)


def get_decoder(hand_model: HandModel, config=None) -> Model:
    """The decoder alone, for posing a hand from angles (the demo, the editor, the animation).

    The identity code and the corrective networks, built as :func:`get_model` builds them in test
    mode, without the encoder (``backbone_net``, ``pose_net``) and without the training objective
    (renderer, penetration tables, Laplacian). Load a snapshot into it with
    :func:`common.io.checkpoint.load_decoder_checkpoint`, which reads a snapshot of any backbone.

    Args:
        hand_model: a loaded :class:`HandModel`.
        config: a :class:`main.config.Config` (``id_code_dim``); the global ``cfg`` when None.
    """
    config = config or default_cfg
    skeleton_refine_net = SkeletonRefineNet(hand_model.joint_num, config.id_code_dim)
    skin_refine_net = SkinRefineNet(hand_model.joint_num, hand_model.vertex_num, config.id_code_dim)
    return Model(None, None, skeleton_refine_net, skin_refine_net, hand_model, config.id_code_dim, config,
                 objective=False)
