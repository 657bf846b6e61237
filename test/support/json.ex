defmodule Quichex.Test.JSON do
  @moduledoc false
  # A small strict JSON decoder for tests (no Hex, OTP 25 has no :json):
  # objects become maps with string keys. Raises on anything malformed.

  def decode!(text) when is_binary(text) do
    {value, rest} = value(skip(text))

    case skip(rest) do
      "" ->
        value

      other ->
        raise ArgumentError,
              "trailing data: #{inspect(binary_part(other, 0, min(20, byte_size(other))))}"
    end
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\t, ?\n, ?\r], do: skip(rest)
  defp skip(rest), do: rest

  defp value(<<?{, rest::binary>>), do: object(skip(rest), %{})
  defp value(<<?[, rest::binary>>), do: array(skip(rest), [])
  defp value(<<?", rest::binary>>), do: string(rest, [])
  defp value(<<"true", rest::binary>>), do: {true, rest}
  defp value(<<"false", rest::binary>>), do: {false, rest}
  defp value(<<"null", rest::binary>>), do: {nil, rest}
  defp value(<<c, _::binary>> = text) when c == ?- or c in ?0..?9, do: number(text)

  defp value(other),
    do:
      raise(
        ArgumentError,
        "unexpected: #{inspect(binary_part(other, 0, min(20, byte_size(other))))}"
      )

  defp object(<<?}, rest::binary>>, acc), do: {acc, rest}

  defp object(<<?", rest::binary>>, acc) do
    {key, rest} = string(rest, [])
    <<?:, rest::binary>> = skip(rest)
    {val, rest} = value(skip(rest))
    acc = Map.put(acc, key, val)

    case skip(rest) do
      <<?,, rest::binary>> -> object(skip(rest), acc)
      <<?}, rest::binary>> -> {acc, rest}
    end
  end

  defp array(<<?], rest::binary>>, acc), do: {Enum.reverse(acc), rest}

  defp array(text, acc) do
    {val, rest} = value(text)

    case skip(rest) do
      <<?,, rest::binary>> -> array(skip(rest), [val | acc])
      <<?], rest::binary>> -> {Enum.reverse([val | acc]), rest}
    end
  end

  defp string(<<?", rest::binary>>, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}

  defp string(<<?\\, c, rest::binary>>, acc) when c in [?", ?\\, ?/],
    do: string(rest, [<<c>> | acc])

  defp string(<<?\\, ?n, rest::binary>>, acc), do: string(rest, ["\n" | acc])
  defp string(<<?\\, ?t, rest::binary>>, acc), do: string(rest, ["\t" | acc])
  defp string(<<?\\, ?r, rest::binary>>, acc), do: string(rest, ["\r" | acc])
  defp string(<<?\\, ?b, rest::binary>>, acc), do: string(rest, ["\b" | acc])
  defp string(<<?\\, ?f, rest::binary>>, acc), do: string(rest, ["\f" | acc])

  defp string(<<?\\, ?u, hex::binary-size(4), rest::binary>>, acc),
    do: string(rest, [<<String.to_integer(hex, 16)::utf8>> | acc])

  defp string(<<c, rest::binary>>, acc) when c >= 0x20, do: string(rest, [<<c>> | acc])

  defp number(text) do
    [token | _] = Regex.run(~r/^-?\d+(\.\d+)?([eE][+-]?\d+)?/, text)
    rest = binary_part(text, byte_size(token), byte_size(text) - byte_size(token))

    if String.contains?(token, [".", "e", "E"]),
      do: {elem(Float.parse(token), 0), rest},
      else: {String.to_integer(token), rest}
  end
end
