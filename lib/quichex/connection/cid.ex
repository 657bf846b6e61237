defmodule Quichex.Connection.CID do
  @moduledoc false
  # Our connection IDs: their length (named here once; a listener parses
  # short-header packets by it), their generator (Quichex.CIDGenerator) and
  # their stateless reset tokens, which derive from a key and the ID so a
  # listener restarted with the same key can reset its old connections.

  @len 16
  @default {Quichex.CIDGenerator.Random, []}

  @doc false
  def len, do: @len

  @doc false
  # `module` or `{module, options}`: raises ArgumentError naming `option`.
  # A generator with prepare/1 gets its options prepared here, once.
  def generator!(nil, _option), do: @default
  def generator!(module, option) when is_atom(module), do: generator!({module, []}, option)

  def generator!({module, options}, option) when is_atom(module) do
    unless Code.ensure_loaded?(module) and function_exported?(module, :generate_cid, 2) do
      raise ArgumentError,
            "invalid value for option #{inspect(option)}: #{inspect(module)} does not implement Quichex.CIDGenerator"
    end

    if function_exported?(module, :prepare, 1) do
      try do
        {module, module.prepare(options)}
      rescue
        error in ArgumentError ->
          reraise ArgumentError,
                  "invalid value for option #{inspect(option)}: #{Exception.message(error)}",
                  __STACKTRACE__
      end
    else
      {module, options}
    end
  end

  def generator!(other, option) do
    raise ArgumentError,
          "invalid value for option #{inspect(option)}: expected a module or {module, options}, got: #{inspect(other)}"
  end

  @doc false
  # A new connection ID from `generator`; one of the wrong length is an error
  # of the generator, raised where it is called.
  def generate({module, options} \\ @default) do
    case module.generate_cid(@len, options) do
      cid when is_binary(cid) and byte_size(cid) == @len ->
        cid

      other ->
        raise ArgumentError,
              "#{inspect(module)}.generate_cid/2 must return #{@len} bytes, got: #{inspect(other, limit: 5)}"
    end
  end

  @doc false
  # The stateless reset token of `cid` under `key` (RFC 9000 section 10.3.2).
  def reset_token(key, cid), do: :crypto.mac(:hmac, :sha256, key, cid) |> binary_part(0, 16)

  @doc false
  def new_key, do: :crypto.strong_rand_bytes(32)
end
