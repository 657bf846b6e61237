defmodule Quichex.Listener.Initial do
  @moduledoc false
  # Checks that a datagram starts with a QUIC v1 client Initial packet that
  # decrypts (RFC 9001 section 5): Initial keys derive from the destination
  # connection ID, so anyone can build a valid Initial, but random bytes,
  # truncated or corrupted packets fail here, in the listener's socket
  # process, in microseconds, before any connection process or quiche state
  # exists for them.

  import Bitwise

  # RFC 9001 section 5.2.
  @v1_salt <<0x38762CF7F55934B34D179AE6A4C80CADCCBB7F0A::160>>
  @tag_len 16
  @sample_len 16

  @doc """
  Whether `packet` (one UDP datagram, coalesced packets allowed) begins with
  a QUIC v1 Initial packet that decrypts and authenticates under the client
  Initial keys of its destination connection ID.
  """
  @spec valid?(binary()) :: boolean()
  def valid?(packet) when is_binary(packet) do
    case parse(packet) do
      {:ok, dcid, pn_offset, length} -> decrypts?(packet, dcid, pn_offset, length)
      :error -> false
    end
  end

  # byte 0: 1 (long) 1 (fixed) 00 (Initial) + protected bits; version 1.
  defp parse(<<first, 1::32, dcid_len, rest::binary>> = packet)
       when (first &&& 0xF0) == 0xC0 and dcid_len <= 20 do
    with <<dcid::binary-size(dcid_len), scid_len, rest::binary>> when scid_len <= 20 <- rest,
         <<_scid::binary-size(scid_len), rest::binary>> <- rest,
         {:ok, token_len, rest} <- varint(rest),
         <<_token::binary-size(token_len), rest::binary>> <- rest,
         {:ok, length, rest} <- varint(rest),
         true <- length >= 4 + @tag_len and length <= byte_size(rest) do
      {:ok, dcid, byte_size(packet) - byte_size(rest), length}
    else
      _ -> :error
    end
  end

  defp parse(_packet), do: :error

  defp varint(<<0::2, v::6, rest::binary>>), do: {:ok, v, rest}
  defp varint(<<1::2, v::14, rest::binary>>), do: {:ok, v, rest}
  defp varint(<<2::2, v::30, rest::binary>>), do: {:ok, v, rest}
  defp varint(<<3::2, v::62, rest::binary>>), do: {:ok, v, rest}
  defp varint(_), do: :error

  defp decrypts?(packet, dcid, pn_offset, length) do
    {key, iv, hp} = keys(dcid)
    sample = binary_part(packet, pn_offset + 4, @sample_len)

    <<m0, mask::binary-size(4), _::binary>> =
      :crypto.crypto_one_time(:aes_128_ecb, hp, sample, true)

    <<first, _::binary>> = packet
    first = bxor(first, m0 &&& 0x0F)
    pn_len = (first &&& 0x03) + 1
    <<_::binary-size(pn_offset), pn_masked::binary-size(pn_len), _::binary>> = packet
    pn_bytes = :crypto.exor(pn_masked, binary_part(mask, 0, pn_len))
    header = [first, binary_part(packet, 1, pn_offset - 1), pn_bytes]
    ct_len = length - pn_len - @tag_len

    <<_::binary-size(pn_offset + pn_len), ct::binary-size(ct_len), tag::binary-size(@tag_len),
      _::binary>> = packet

    pn = :binary.decode_unsigned(pn_bytes)
    nonce = :crypto.exor(iv, <<pn::96>>)
    reserved_clear = (first &&& 0x0C) == 0

    reserved_clear and
      is_binary(
        :crypto.crypto_one_time_aead(
          :aes_128_gcm,
          key,
          nonce,
          ct,
          IO.iodata_to_binary(header),
          tag,
          false
        )
      )
  end

  defp keys(dcid) do
    initial = :crypto.mac(:hmac, :sha256, @v1_salt, dcid)
    client = expand_label(initial, "client in", 32)

    {expand_label(client, "quic key", 16), expand_label(client, "quic iv", 12),
     expand_label(client, "quic hp", 16)}
  end

  # HKDF-Expand-Label (RFC 8446 section 7.1) for lengths up to one block.
  defp expand_label(secret, label, len) do
    full = "tls13 " <> label
    info = <<len::16, byte_size(full), full::binary, 0>>

    <<out::binary-size(len), _::binary>> =
      :crypto.mac(:hmac, :sha256, secret, <<info::binary, 1>>)

    out
  end
end
