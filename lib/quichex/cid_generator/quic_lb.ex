defmodule Quichex.CIDGenerator.QuicLB do
  @moduledoc """
  A `Quichex.CIDGenerator` making QUIC-LB routable connection IDs
  ([draft-ietf-quic-load-balancers](https://datatracker.ietf.org/doc/draft-ietf-quic-load-balancers/),
  drafts 19 to 21): every connection ID names the node (server ID) that owns
  the connection, in the clear or encrypted, so a QUIC-LB-aware layer-4 load
  balancer routes every packet of a connection to that node, after a
  migration or a NAT rebinding too. See the deployment guide.

      Quichex.Listener.start_link(
        port: 4433,
        config: config,
        handler: MyHandler,
        connection_id_generator:
          {Quichex.CIDGenerator.QuicLB,
           config_id: 0, server_id: <<0x0A, 0x01>>, key: load_balancer_key}
      )

  ## Options

    * `:config_id` (required) - the configuration's identifier, `0..6`,
      written in the three high bits of the first octet (the draft's config
      rotation bits; `7` is reserved for unroutable IDs). Give a new key, or
      new lengths, a new config id so that the load balancer can tell old IDs
      from new ones while both are about.
    * `:server_id` (required to make IDs) - this node's server ID, a binary
      of 1 to 15 bytes. All nodes of a configuration use the same length.
    * `:server_id_len` - for a configuration that only decodes (a load
      balancer's): the server ID length, `1..15`, instead of `:server_id`.
    * `:nonce_len` - the nonce length, `4..18` bytes; `server_id_len +
      nonce_len` may not exceed 19. Default: what fills a Quichex connection
      ID, #{Quichex.Connection.CID.len()} - 1 - `server_id_len` bytes.
    * `:key` - `nil` (the default: plaintext, anyone can read the server ID)
      or a 16-byte AES-128 key shared with the load balancer (encrypted).
    * `:length_self_description` - `true` (the default) writes the length of
      the ID after the first octet in the first octet's five low bits, as
      the draft's test vectors do (hardware offload may use it; a load
      balancer may check it); `false` makes those five bits random.

  Bad options raise `ArgumentError` naming the option.

  ## Lengths

  A generated ID is `1 + server_id_len + nonce_len` bytes and must be as
  long as Quichex's connection IDs, #{Quichex.Connection.CID.len()} bytes
  (a listener parses short-header packets by that length): so
  `server_id_len + nonce_len` must be #{Quichex.Connection.CID.len() - 1},
  which the default `:nonce_len` gives. A 2-byte server ID (65,536 nodes)
  leaves a 13-byte nonce; a 1-byte one a 14-byte nonce. Generating an ID of
  another length raises `ArgumentError`. (`encode/2` and `decode/2` take any
  length the draft allows, e.g. for load balancers of other servers.)

  ## Encodings

    * plaintext (no `:key`): `first octet || server ID || nonce`, the nonce
      random;
    * encrypted, `server_id_len + nonce_len == 16`: the 16 bytes after the
      first octet are one AES-128-ECB block (single pass); Quichex's
      16-byte IDs cannot take this case (it needs 17-byte IDs);
    * encrypted, any other length: the draft's four-pass Feistel network
      with AES-128-ECB as its round function.

  Encrypted nonces come from a counter shared by everything generating with
  one prepared configuration (a listener and its connections) that starts
  at a random value, as the draft advises, so no nonce repeats until the
  counter has gone once round the nonce space. Should that ever happen, the
  generator makes unroutable IDs (config rotation bits `0b111`, random
  rest) instead of reusing nonces: issue a new configuration (a new config
  id and key) long before. Plaintext nonces are random: with `n`-byte nonces
  expect a repeat after about 2^(4n) IDs.

  `Quichex.CIDGenerator` prepares the options once, through `prepare/1` (the
  key is checked there, once, not for every ID).
  """
  @behaviour Quichex.CIDGenerator

  import Bitwise

  alias Quichex.Connection.CID

  @enforce_keys [:config_id, :server_id_len, :nonce_len]
  defstruct [
    :config_id,
    :server_id,
    :server_id_len,
    :nonce_len,
    :key,
    :counter,
    :nonce_start,
    length_self_description: true
  ]

  @typedoc "A prepared configuration, from `new/1`."
  @type t :: %__MODULE__{
          config_id: 0..6,
          server_id: binary() | nil,
          server_id_len: 1..15,
          nonce_len: 4..18,
          key: <<_::128>> | nil,
          counter: :atomics.atomics_ref() | nil,
          nonce_start: non_neg_integer() | nil,
          length_self_description: boolean()
        }

  @typedoc "What `decode/2` finds in a connection ID."
  @type decoded :: %{config_id: 0..6, server_id: binary(), nonce: binary()}

  @unroutable 0b111
  @keys [:config_id, :server_id, :server_id_len, :nonce_len, :key, :length_self_description]

  ## Public API

  @doc """
  Validates `options` (see the moduledoc) into a prepared configuration.

      iex> config = Quichex.CIDGenerator.QuicLB.new(config_id: 1, server_id: <<7, 7>>)
      iex> config.nonce_len
      13
  """
  @spec new(keyword()) :: t()
  def new(options) when is_list(options) do
    unless Keyword.keyword?(options) do
      raise ArgumentError, "expected a keyword list of QUIC-LB options, got: #{inspect(options)}"
    end

    for {key, _} <- options, key not in @keys do
      raise ArgumentError,
            "unknown QUIC-LB option #{inspect(key)}, expected one of #{inspect(@keys)}"
    end

    config_id = config_id!(Keyword.get(options, :config_id))
    {server_id, sid_len} = server_id!(options)
    nonce_len = nonce_len!(Keyword.get(options, :nonce_len, CID.len() - 1 - sid_len), sid_len)
    key = key!(Keyword.get(options, :key))

    self_description =
      case Keyword.get(options, :length_self_description, true) do
        bool when is_boolean(bool) ->
          bool

        other ->
          raise ArgumentError,
                "invalid value for QUIC-LB option :length_self_description: expected a boolean, got: #{inspect(other)}"
      end

    %__MODULE__{
      config_id: config_id,
      server_id: server_id,
      server_id_len: sid_len,
      nonce_len: nonce_len,
      key: key,
      counter: if(key, do: :atomics.new(1, signed: false)),
      nonce_start: if(key, do: :rand.uniform(1 <<< (8 * nonce_len)) - 1),
      length_self_description: self_description
    }
  end

  def new(options) do
    raise ArgumentError, "expected a keyword list of QUIC-LB options, got: #{inspect(options)}"
  end

  @doc """
  Prepares `options` once for `generate_cid/2` (the `Quichex.CIDGenerator`
  callback); the same as `new/1`.

      iex> config = Quichex.CIDGenerator.QuicLB.prepare(config_id: 1, server_id: <<7>>)
      iex> byte_size(Quichex.CIDGenerator.QuicLB.generate_cid(16, config))
      16
  """
  @impl Quichex.CIDGenerator
  @spec prepare(keyword() | t()) :: t()
  def prepare(%__MODULE__{} = config), do: config
  def prepare(options), do: new(options)

  @doc """
  A new connection ID of `length` bytes (`Quichex.CIDGenerator` callback).
  `config` is a prepared configuration or the options for one.

      iex> config = Quichex.CIDGenerator.QuicLB.new(config_id: 2, server_id: <<9>>)
      iex> cid = Quichex.CIDGenerator.QuicLB.generate_cid(16, config)
      iex> Quichex.CIDGenerator.QuicLB.decode(cid, config) |> elem(1) |> Map.take([:config_id, :server_id])
      %{config_id: 2, server_id: <<9>>}
  """
  @impl Quichex.CIDGenerator
  @spec generate_cid(pos_integer(), t() | keyword()) :: binary()
  def generate_cid(length, %__MODULE__{server_id: nil}) when is_integer(length) do
    raise ArgumentError,
          "a QUIC-LB configuration without :server_id (only :server_id_len) cannot make connection IDs"
  end

  def generate_cid(length, %__MODULE__{} = config) when is_integer(length) do
    expected = 1 + config.server_id_len + config.nonce_len

    unless length == expected do
      raise ArgumentError,
            "QUIC-LB connection IDs of this configuration are #{expected} bytes " <>
              "(1 + server_id #{config.server_id_len} + :nonce_len #{config.nonce_len}), " <>
              "but #{length} were asked for: choose :nonce_len = #{length - 1 - config.server_id_len}"
    end

    case next_nonce(config) do
      {:ok, nonce} -> encode(config, nonce)
      :exhausted -> unroutable(length)
    end
  end

  def generate_cid(length, options) when is_integer(length) and is_list(options),
    do: generate_cid(length, new(options))

  def generate_cid(length, config) do
    raise ArgumentError,
          "expected a length and a QUIC-LB configuration, got: #{inspect(length)}, #{inspect(config)}"
  end

  @doc """
  The connection ID carrying `config`'s server ID and `nonce` (exactly
  `nonce_len` bytes). `generate_cid/2` picks the nonce; this is for tests
  and tools.

      iex> config = Quichex.CIDGenerator.QuicLB.new(config_id: 0, server_id: <<0xC4, 0x60, 0x5E>>, nonce_len: 4)
      iex> Quichex.CIDGenerator.QuicLB.encode(config, <<0x45, 0x04, 0xCC, 0x4F>>)
      <<0x07, 0xC4, 0x60, 0x5E, 0x45, 0x04, 0xCC, 0x4F>>
  """
  @spec encode(t(), binary()) :: binary()
  def encode(%__MODULE__{server_id: sid, nonce_len: nonce_len} = config, nonce)
      when is_binary(sid) and is_binary(nonce) and byte_size(nonce) == nonce_len do
    plaintext = sid <> nonce
    first_octet(config, byte_size(plaintext)) <> encrypt(config.key, plaintext)
  end

  def encode(%__MODULE__{server_id: nil}, _nonce) do
    raise ArgumentError, "a QUIC-LB configuration without :server_id cannot encode"
  end

  def encode(config, nonce) do
    raise ArgumentError,
          "expected a QUIC-LB configuration and a nonce of its :nonce_len, got: #{inspect(config)}, #{inspect(nonce)}"
  end

  @doc """
  Reads the server ID (and nonce) out of a connection ID, as a load balancer
  does: with the configuration named by the ID's config rotation bits, out
  of `configs` (one configuration or a list, at most one per config id).
  Only lengths and key matter here; a load-balancer-side configuration may
  be built with `:server_id_len`. Bytes after the configured length (the
  server's own) are ignored.

  Returns `{:error, :unroutable}` when no configuration has the ID's config
  id (`0b111` never has one) or the ID is too short for it.

      iex> lb = Quichex.CIDGenerator.QuicLB.new(config_id: 0, server_id_len: 3, nonce_len: 4)
      iex> Quichex.CIDGenerator.QuicLB.decode(<<0x07, 0xC4, 0x60, 0x5E, 0x45, 0x04, 0xCC, 0x4F>>, lb)
      {:ok, %{config_id: 0, server_id: <<0xC4, 0x60, 0x5E>>, nonce: <<0x45, 0x04, 0xCC, 0x4F>>}}
      iex> Quichex.CIDGenerator.QuicLB.decode(<<0xE7, 1, 2, 3, 4, 5, 6, 7>>, lb)
      {:error, :unroutable}
  """
  @spec decode(binary(), t() | [t()]) :: {:ok, decoded()} | {:error, :unroutable}
  def decode(cid, %__MODULE__{} = config), do: decode(cid, [config])

  def decode(<<cr::3, _::5, rest::binary>>, configs) when is_list(configs) do
    case Enum.find(configs, &match?(%__MODULE__{config_id: ^cr}, &1)) do
      %__MODULE__{server_id_len: sid_len, nonce_len: nonce_len, key: key}
      when byte_size(rest) >= sid_len + nonce_len ->
        <<block::binary-size(sid_len + nonce_len), _server_use::binary>> = rest
        <<sid::binary-size(sid_len), nonce::binary>> = decrypt(key, block)
        {:ok, %{config_id: cr, server_id: sid, nonce: nonce}}

      %__MODULE__{} ->
        {:error, :unroutable}

      nil ->
        unless Enum.all?(configs, &is_struct(&1, __MODULE__)), do: bad_decode!(configs)
        {:error, :unroutable}
    end
  end

  def decode(cid, configs) when is_binary(cid) and is_list(configs) do
    unless Enum.all?(configs, &is_struct(&1, __MODULE__)), do: bad_decode!(configs)
    {:error, :unroutable}
  end

  def decode(_cid, configs), do: bad_decode!(configs)

  ## Helpers

  @spec bad_decode!(term()) :: no_return()
  defp bad_decode!(configs) do
    raise ArgumentError,
          "expected a connection ID and QUIC-LB configurations from new/1, got: #{inspect(configs)}"
  end

  defp config_id!(id) when id in 0..6, do: id

  defp config_id!(other) do
    raise ArgumentError,
          "invalid value for QUIC-LB option :config_id: expected an integer in 0..6 " <>
            "(7 is reserved for unroutable IDs), got: #{inspect(other)}"
  end

  defp server_id!(options) do
    case {Keyword.fetch(options, :server_id), Keyword.fetch(options, :server_id_len)} do
      {{:ok, sid}, :error} when is_binary(sid) and byte_size(sid) in 1..15 ->
        {sid, byte_size(sid)}

      {{:ok, other}, :error} ->
        raise ArgumentError,
              "invalid value for QUIC-LB option :server_id: expected a binary of 1 to 15 bytes, got: #{inspect(other)}"

      {:error, {:ok, len}} when len in 1..15 ->
        {nil, len}

      {:error, {:ok, other}} ->
        raise ArgumentError,
              "invalid value for QUIC-LB option :server_id_len: expected an integer in 1..15, got: #{inspect(other)}"

      {:error, :error} ->
        raise ArgumentError, "QUIC-LB option :server_id is required (or :server_id_len to decode)"

      {{:ok, _}, {:ok, _}} ->
        raise ArgumentError, "give QUIC-LB option :server_id or :server_id_len, not both"
    end
  end

  defp nonce_len!(len, sid_len) when len in 4..18 and len + sid_len <= 19, do: len

  defp nonce_len!(other, sid_len) do
    raise ArgumentError,
          "invalid value for QUIC-LB option :nonce_len: expected an integer in 4..18 with " <>
            "server ID length (#{sid_len}) + nonce length <= 19, got: #{inspect(other)}"
  end

  defp key!(nil), do: nil
  defp key!(key) when is_binary(key) and byte_size(key) == 16, do: key

  defp key!(other) do
    raise ArgumentError,
          "invalid value for QUIC-LB option :key: expected nil or a 16-byte binary, got: #{inspect(other, limit: 5)}"
  end

  defp first_octet(%__MODULE__{config_id: cr, length_self_description: true}, len),
    do: <<cr::3, len::5>>

  defp first_octet(%__MODULE__{config_id: cr}, _len) do
    <<_::3, random::5>> = :crypto.strong_rand_bytes(1)
    <<cr::3, random::5>>
  end

  defp next_nonce(%__MODULE__{key: nil, nonce_len: len}),
    do: {:ok, :crypto.strong_rand_bytes(len)}

  defp next_nonce(%__MODULE__{counter: counter, nonce_start: start, nonce_len: len}) do
    space = 1 <<< (8 * len)

    case :atomics.add_get(counter, 1, 1) - 1 do
      n when n < space -> {:ok, <<rem(start + n, space)::size(len)-unit(8)>>}
      _ -> :exhausted
    end
  end

  defp unroutable(length) do
    <<@unroutable::3, length - 1::5>> <> :crypto.strong_rand_bytes(length - 1)
  end

  ## Ciphers

  defp encrypt(nil, plaintext), do: plaintext
  defp encrypt(key, <<_::binary-size(16)>> = block), do: aes(key, block)

  defp encrypt(key, plaintext) do
    len = byte_size(plaintext)
    {left0, right0} = split(plaintext)
    right1 = feistel_round(key, len, 1, left0, right0) |> clear_right(len)
    left1 = feistel_round(key, len, 2, right1, left0) |> clear_left(len)
    right2 = feistel_round(key, len, 3, left1, right1) |> clear_right(len)
    left2 = feistel_round(key, len, 4, right2, left1) |> clear_left(len)
    join(left2, right2, len)
  end

  defp decrypt(nil, block), do: block
  defp decrypt(key, <<_::binary-size(16)>> = block), do: aes_decrypt(key, block)

  defp decrypt(key, ciphertext) do
    len = byte_size(ciphertext)
    {left2, right2} = split(ciphertext)
    left1 = feistel_round(key, len, 4, right2, left2) |> clear_left(len)
    right1 = feistel_round(key, len, 3, left1, right2) |> clear_right(len)
    left0 = feistel_round(key, len, 2, right1, left1) |> clear_left(len)
    right0 = feistel_round(key, len, 1, left0, right1) |> clear_right(len)
    join(left0, right0, len)
  end

  # XORs `target` with the first half-length bytes of
  # AES(expand(len, pass, input)).
  defp feistel_round(key, len, pass, input, target) do
    half = byte_size(input)
    expanded = input <> :binary.copy(<<0>>, 14 - half) <> <<len, pass>>
    <<pad::binary-size(half), _::binary>> = aes(key, expanded)
    :crypto.exor(target, pad)
  end

  # Halves of ceil(len / 2) bytes; with an odd length they share the middle
  # byte, the left keeping its high four bits and the right its low four.
  defp split(bin) do
    len = byte_size(bin)
    half = div(len + 1, 2)
    left = binary_part(bin, 0, half) |> clear_left(len)
    right = binary_part(bin, len - half, half) |> clear_right(len)
    {left, right}
  end

  defp join(left, right, len) when rem(len, 2) == 0, do: left <> right

  defp join(left, right, _len) do
    head_len = byte_size(left) - 1
    <<head::binary-size(head_len), l>> = left
    <<r, tail::binary>> = right
    <<head::binary, (l &&& 0xF0) ||| (r &&& 0x0F), tail::binary>>
  end

  defp clear_left(half, len) when rem(len, 2) == 0, do: half

  defp clear_left(half, _len) do
    head_len = byte_size(half) - 1
    <<head::binary-size(head_len), last>> = half
    <<head::binary, last &&& 0xF0>>
  end

  defp clear_right(half, len) when rem(len, 2) == 0, do: half
  defp clear_right(<<first, rest::binary>>, _len), do: <<first &&& 0x0F, rest::binary>>

  defp aes(key, block), do: :crypto.crypto_one_time(:aes_128_ecb, key, block, true)
  defp aes_decrypt(key, block), do: :crypto.crypto_one_time(:aes_128_ecb, key, block, false)
end
