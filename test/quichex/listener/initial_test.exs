defmodule Quichex.Listener.InitialTest do
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.Listener.Initial

  test "a real client's Initial decrypts; its second datagram too" do
    flight = first_flight()
    assert flight != []
    for datagram <- flight, do: assert(Initial.valid?(datagram))
  end

  test "a corrupted byte anywhere in the packet fails" do
    [datagram | _] = first_flight()
    {:ok, _dcid, pn_offset, length} = parse(datagram)

    # Every byte of the header (past the first) and the protected payload.
    for pos <- Enum.take_random(1..(pn_offset + length - 1), 200) do
      <<a::binary-size(pos), b, c::binary>> = datagram
      refute Initial.valid?(<<a::binary, Bitwise.bxor(b, 0x01), c::binary>>), "byte #{pos}"
    end
  end

  test "garbage, truncations, other versions and packet types fail" do
    [datagram | _] = first_flight()
    <<first, _version::32, rest::binary>> = datagram

    refute Initial.valid?(<<>>)
    refute Initial.valid?(:crypto.strong_rand_bytes(1200))
    refute Initial.valid?(binary_part(datagram, 0, 40))
    refute Initial.valid?(binary_part(datagram, 0, div(byte_size(datagram), 2)))
    refute Initial.valid?(<<first, 0x6B3343CF::32, rest::binary>>)
    # A Handshake packet type (0b10) with the same bytes.
    refute Initial.valid?(<<Bitwise.bor(first, 0x20), 1::32, rest::binary>>)

    for _ <- 1..500 do
      random = <<0xC0, 1::32, 8, :crypto.strong_rand_bytes(1195)::binary>>
      refute Initial.valid?(random)
    end
  end

  # The test's own header parse, for positions.
  defp parse(
         <<_first, 1::32, dl, dcid::binary-size(dl), sl, _::binary-size(sl), rest::binary>> = p
       ) do
    {tl, rest} = varint(rest)
    <<_::binary-size(tl), rest::binary>> = rest
    {len, rest} = varint(rest)
    {:ok, dcid, byte_size(p) - byte_size(rest), len}
  end

  defp varint(<<0::2, v::6, r::binary>>), do: {v, r}
  defp varint(<<1::2, v::14, r::binary>>), do: {v, r}
  defp varint(<<2::2, v::30, r::binary>>), do: {v, r}
end
