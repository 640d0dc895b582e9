"""DETR's encoder-decoder transformer.

Differences from torch.nn.Transformer, kept for checkpoint and numerical compatibility:
positional encodings are added to queries and keys (not values) in every attention layer,
the decoder has a final LayerNorm applied to every intermediate output, and the encoder has
one only with pre-norm. Tensors are sequence-first: [S, B, C].
"""
import torch
from torch import nn

from .layers import (
    ResidualLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    activation_fn,
    attend,
    get_clones,
    with_pos_embed,
)


class Transformer(nn.Module):

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 return_intermediate_dec=False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                                activation, normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)

        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout,
                                                activation, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        """src [B,C,H,W], mask [B,H,W] (True = padding), query_embed [Q,C], pos_embed [B,C,H,W].

        Returns (hs [L,B,Q,C] with L = decoder layers or 1, memory [B,C,H,W]).
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)

        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


class TransformerDecoder(nn.Module):

    def __init__(self, decoder_layer, num_layers, norm, return_intermediate=False):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        """Returns [L,Q,B,C]: every layer's normalised output, or only the last one (L = 1)."""
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(output, memory, memory_key_padding_mask=memory_key_padding_mask,
                           pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(output).unsqueeze(0)


class TransformerDecoderLayer(ResidualLayer):

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__(normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        def self_attention(x):
            q = k = with_pos_embed(x, query_pos)
            return attend(self.self_attn, q, k, x)

        def cross_attention(x):
            return attend(self.multihead_attn, with_pos_embed(x, query_pos), with_pos_embed(memory, pos), memory,
                          key_padding_mask=memory_key_padding_mask)

        tgt = self._residual(tgt, self_attention, self.norm1, self.dropout1)
        tgt = self._residual(tgt, cross_attention, self.norm2, self.dropout2)
        return self._residual(tgt, self._ffn, self.norm3, self.dropout3)


def build_transformer(args):
    return Transformer(
        d_model=args.hidden_dim,
        dropout=args.dropout,
        nhead=args.nheads,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        normalize_before=args.pre_norm,
        return_intermediate_dec=True,
    )
